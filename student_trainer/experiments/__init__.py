"""Experiments over training runs (``python -m student_trainer.experiments.compare``): one trainer config run
once per mode and seed as child processes (``compare``), the paired statistics of a multi-seed comparison
(``seed_stats``) and stopping a child process cleanly (``processes``). Above the trainer: it starts
``livefuse-train`` and reads what the runs wrote; the demo builds on it."""
