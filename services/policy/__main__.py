"""`python -m services.policy`: same as `rlhf serve policy`."""

from services.policy.app import command

if __name__ == "__main__":
    command(prog_name="python -m services.policy")
