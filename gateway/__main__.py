"""`python -m gateway`: same as `rlhf serve gateway`."""

from gateway.cli import command

if __name__ == "__main__":
    command(prog_name="python -m gateway")
