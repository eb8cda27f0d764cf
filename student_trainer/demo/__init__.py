"""The README's main job (``python -m student_trainer.demo``): a small, real FuseLLM experiment on CPU.
``assets`` (real tokenizers, tiny models), ``corpus``, ``models`` (pretraining), ``teacher_process``
(teachers as child processes), ``report``; ``__main__`` runs it. May import everything above it."""
