from .demo import main
import sys

sys.exit(main())
