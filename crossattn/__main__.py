from .demo import main
import sys

sys.exit(main(prog="python -m crossattn"))
