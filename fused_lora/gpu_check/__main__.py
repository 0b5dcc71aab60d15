"""`python -m fused_lora.gpu_check [--quick | --dry-run]`: see fused_lora/gpu_check/__init__.py."""

import sys

from fused_lora.gpu_check.driver import main

sys.exit(main())
