"""`python -m services.trainer`: same as `rlhf serve trainer`."""

from services.trainer.app import command

if __name__ == "__main__":
    command(prog_name="python -m services.trainer")
