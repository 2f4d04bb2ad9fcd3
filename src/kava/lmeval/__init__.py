"""kava as an lm-evaluation-harness model (``pip install kava[lmeval]``).

Importing ``kava.lmeval.model`` registers the model ``kava``. The ``lm_eval`` command
cannot import it by itself, so run the harness through kava's thin wrapper, which takes
every ``lm_eval`` argument::

    python -m kava.lmeval --model kava --model_args checkpoint=runs/x/final \\
        --tasks my_task --include_path my_tasks/ --log_samples --output_path out/

(``--model kava`` is added when missing). ``model_args``: ``checkpoint`` (a checkpoint
folder, a run folder or a Hub repo id, as ``LatentReasoner.from_pretrained``), and
optionally ``dtype``, ``max_new_tokens``, ``revision`` and ``parse_answer=true`` (return kava's parsed number instead of the generated text, so that
``exact_match`` against the gold number scores as ``kava eval`` does). Only
``generate_until`` tasks work: a latent model has no likelihood of a written
continuation. The device and batch size are lm-eval's own flags (``--device cpu``,
``--batch_size 16``; ``auto`` = the checkpoint's ``eval.batch_size``); lm-eval's default
device ``cuda:0`` falls back to the CPU where there is no GPU. Each request's context is
the question: write the task's ``doc_to_text`` as the bare question (``{{question}}``),
kava adds the prompt its method was trained with.
"""
