"""`python -m effarch.train CONFIG... [key=value ...]` is `effarch train ...`."""

import sys

from effarch.train.main import main

main(["train", *sys.argv[1:]])
