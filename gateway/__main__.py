"""`python -m gateway`: same as `rlhf serve gateway`."""

import sys

if __name__ == "__main__":
    print("the gateway is not implemented yet (issue #6)", file=sys.stderr)
    sys.exit(2)
