"""The trainer: TrainerService (app.py, config.py) and the training stages, one folder each:
ppo/ (the learner and the runs the service starts), sft/ and rm/; shared by them: data.py (JSONL
readers), distributed.py (data parallelism), rl_math.py (the math), settings.py (the settings
style), errors.py."""
