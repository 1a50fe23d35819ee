"""`python -m services.reward`: same as `rlhf serve reward`."""

from services.reward.app import command

if __name__ == "__main__":
    command(prog_name="python -m services.reward")
