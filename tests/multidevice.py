"""Runs a test script in a fresh Python process (for several CPU devices).

``jax_num_cpu_devices`` must be set before JAX initialises its backends, so
tests that need 4 or 8 devices write a script that sets it first and run it
here; the script prints ``OK`` when every check passed.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(tmp_path, text: str, timeout: int = 900) -> None:
  """Runs ``text`` as a script from the repository root, on CPU; asserts OK."""
  script = tmp_path / 'run.py'
  script.write_text(text)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]
