"""Runs docs/tutorial.md's python blocks as written (real MNIST, 3 epochs).

From the repository root, after `python -m experiments.fetch_data mnist`:
  JAX_PLATFORMS=cpu python experiments/results/tutorial/run_tutorial.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))
import test_docs  # pylint: disable=g-import-not-at-top

t0 = time.perf_counter()
ns = {'__name__': 'tutorial'}
for b in test_docs.python_blocks('docs/tutorial.md'):
  print(f'--- block at line {b.line} ({time.perf_counter() - t0:.0f} s)',
        flush=True)
  exec(compile(b.code, f'docs/tutorial.md:{b.line}', 'exec'), ns)  # pylint: disable=exec-used
print(f'total wall {time.perf_counter() - t0:.0f} s', flush=True)
