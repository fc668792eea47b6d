import sys
from pathlib import Path

# Make the test-only helpers (recipe64) importable without turning tests/ into a package.
sys.path.insert(0, str(Path(__file__).parent))
