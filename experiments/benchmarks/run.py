"""Speed and memory of adder networks vs conv networks, in one process.

``python -m experiments.benchmarks.run`` measures, side by side (interleaved
medians after warm-up, see :mod:`experiments.benchmarks.common`) and prints
Markdown tables with ratios:

1. **The machine's floor** (:mod:`experiments.benchmarks.floor`): matmul vs
   XLA vector-loop rates of multiply-add, ``max``, ``|x - w|`` and the
   HardTanh gradient on this CPU, and the adder/conv time ratio they allow.
2. **Layer level** (:mod:`experiments.benchmarks.layers`): forward and
   forward+backward time and peak memory of ``adder_conv`` vs
   ``lax.conv_general_dilated`` on the same shapes: ResNet-20 (batch 64 and
   128), VGG-small (16), LeNet-5-BN (256), a ResNet-50 bottleneck (16); vs the
   official unfold algorithm where its broadcast tensor fits in memory
   (ResNet-20 batch 64, LeNet-5); the rate each adder forward reaches, as a
   fraction of the floor.
3. **Model level** (:mod:`experiments.benchmarks.models`): train-step time,
   images/s, compile time and peak memory of AddNN vs CNN (LeNet-5-BN,
   ResNet-20 at batch 64 and 128, VGG-small at 32; float32 and bfloat16).
4. **Targets**: each figure of the speed issue against its target.

The default run takes about 5 minutes on an idle 2-core machine (longer
under load); ``--quick`` trims repeats and cases. The results of one run, with
the method and an analysis, are in ``docs/performance.md``.

Examples:
  python -m experiments.benchmarks.run
  python -m experiments.benchmarks.run --quick
  python -m experiments.benchmarks.run --skip-models --json out.json
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence

from absl import flags

from experiments import cli
from experiments.benchmarks import common
from experiments.benchmarks import floor
from experiments.benchmarks import layers
from experiments.benchmarks import models


def efficiency_table(results: Sequence[layers.LayerResult],
                     fl: floor.Floor) -> str:
  """Achieved rates of each layer vs the machine floor."""
  rows = []
  for r in results:
    terms = r.case.terms
    conv_rate = terms / r.t('conv_f') / 1e9
    add_rate = terms / r.t('adder_f') / 1e9
    add_fb = 2 * terms / r.t('adder_fb') / 1e9  # l1 terms of fwd + dx
    rows.append([
        f'{r.case.net} {r.case.name}', f'{terms / 1e6:.0f}M',
        f'{conv_rate:.1f}', f'{conv_rate / fl.rates["matmul"]:.0%}',
        f'{add_rate:.1f}', f'{add_rate / fl.rates["loop max"]:.0%}',
        common.fmt_ratio(r.t('adder_f'), r.t('conv_f')),
        f'{fl.forward_ratio():.2f}x',
        common.fmt_ratio(r.t('adder_fb'), r.t('conv_fb')),
        f'{fl.fwd_bwd_ratio():.2f}x',
        f'{add_fb:.1f}',
    ])
  return common.table(
      ['layer', 'terms', 'conv fwd GMAC/s', 'of matmul', 'adder fwd G/s',
       'of loop max', 'adder/conv fwd', 'floor fwd', 'adder/conv f+b',
       'floor f+b', 'adder f+b G l1-terms/s'], rows)


def targets(layer_results, model_results) -> tuple[str, dict]:
  """The issue's "done when" figures, with PASS / MISS."""
  lines, data = [], {}

  def check(name, value, limit, higher_is_better=False, fmt='{:.2f}x'):
    ok = value >= limit if higher_is_better else value <= limit
    if not math.isfinite(value):
      ok = False
    rel = '>=' if higher_is_better else '<='
    lines.append(f'| {name} | {fmt.format(value)} | {rel} {fmt.format(limit)}'
                 f' | {"PASS" if ok else "MISS"} |')
    data[name] = {'value': value, 'limit': limit, 'pass': ok}

  for r in model_results:
    if r.case.model == 'resnet20' and r.case.dtype == 'float32':
      check(f'AddNN/CNN ResNet-20 train step b{r.case.batch}',
            r.t('adder') / r.t('cnn'), 3.0)
  for r in model_results:
    if r.case.model == 'resnet20' and r.case.dtype == 'float32':
      a, c = r.cands.get('adder'), r.cands.get('cnn')
      if a and c:
        check(f'AddNN/CNN ResNet-20 peak memory b{r.case.batch}',
              a.peak_bytes / c.peak_bytes, 1.5)
  worst = {}
  for r in layer_results:
    if r.case.net.startswith('resnet20'):
      ratio = r.t('adder_fb') / r.t('conv_fb')
      key = r.case.net
      if key not in worst or ratio > worst[key][0] or not math.isfinite(
          ratio):
        worst[key] = (ratio, r.case.name)
  for net, (ratio, name) in worst.items():
    check(f'worst ResNet-20 layer f+b adder/conv ({net}, {name})', ratio, 3.0)
  speed = [(r.t('unfold_fb') / r.t('adder_fb'), r) for r in layer_results
           if 'unfold_fb' in r.cands]
  mem = [(r.mem('unfold_fb') / r.mem('adder_fb'), r) for r in layer_results
         if 'unfold_fb' in r.cands]
  if speed:
    v, r = min(speed, key=lambda t: t[0])
    check(f'min unfold/adder f+b time ({r.case.net} {r.case.name})', v, 30.0,
          higher_is_better=True, fmt='{:.0f}x')
    rn = [v for v, r in speed if r.case.k_shape[0] == 3]
    if rn:
      check('min unfold/adder f+b time, 3x3 layers', min(rn), 30.0,
            higher_is_better=True, fmt='{:.0f}x')
  if mem:
    v, r = min(mem, key=lambda t: t[0])
    check(f'min unfold/adder f+b memory ({r.case.net} {r.case.name})', v,
          20.0, higher_is_better=True, fmt='{:.0f}x')
    rn = [v for v, r in mem if r.case.k_shape[0] == 3]
    if rn:
      check('min unfold/adder f+b memory, 3x3 layers', min(rn), 20.0,
            higher_is_better=True, fmt='{:.0f}x')
  # Whole ResNet-20 (its adder layers, each counted as often as it occurs).
  counts = {'stage1 3x3': 6, 'stage2 3x3/2': 1, 'stage2 1x1/2': 1,
            'stage2 3x3': 5, 'stage3 3x3/2': 1, 'stage3 1x1/2': 1,
            'stage3 3x3': 5}
  net = [r for r in layer_results if r.case.net == 'resnet20/b64'
         and 'unfold_fb' in r.cands and r.case.name in counts]
  if len(net) == len(counts):
    t_unf = sum(counts[r.case.name] * r.t('unfold_fb') for r in net)
    t_add = sum(counts[r.case.name] * r.t('adder_fb') for r in net)
    check('ResNet-20 b64, all 19 adder layers: unfold/adder f+b time',
          t_unf / t_add, 30.0, higher_is_better=True, fmt='{:.0f}x')
    m_unf = max(r.mem('unfold_fb') for r in net)
    m_add = max(r.mem('adder_fb') for r in net)
    check('ResNet-20 b64, largest layer peak: unfold/adder f+b memory',
          m_unf / m_add, 20.0, higher_is_better=True, fmt='{:.0f}x')
  head = '| target | measured | limit | |\n|---|---:|---:|---|'
  return head + '\n' + '\n'.join(lines) + '\n', data


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines this program's flags on ``flag_values``."""
  fv = flag_values
  flags.DEFINE_bool('quick', False, 'Fewer repeats and cases (about 4 '
                    'minutes idle).', flag_values=fv)
  flags.DEFINE_bool('skip-layers', False, 'Skip the layer level.',
                    flag_values=fv)
  flags.DEFINE_bool('skip-models', False, 'Skip the model level.',
                    flag_values=fv)
  flags.DEFINE_bool('skip-unfold', False, 'Skip the official unfold '
                    'algorithm.', flag_values=fv)
  flags.DEFINE_string('json', None, 'Also write the raw numbers to this '
                      'file.', flag_values=fv)


def main(flag_values: flags.FlagValues, args: list[str]) -> None:
  """Runs the benchmarks and prints the tables."""
  cli.no_arguments(args)
  fv = flag_values
  quick = fv.quick
  t_start = time.perf_counter()
  reps = 3 if quick else 7
  print(common.machine_line(), flush=True)
  load_before = common.load_average()

  print('\n# 1. Machine floor\n', flush=True)
  fl = floor.measure(repeats=reps)
  print(floor.report(fl), flush=True)

  layer_results = []
  if not fv['skip-layers'].value:
    print('# 2. Layer level\n', flush=True)
    with_unfold = not fv['skip-unfold'].value
    suites = [(layers.resnet20_cases(64), with_unfold)]
    if not quick:
      suites.append((layers.resnet20_cases(128), False))
    suites.append((layers.lenet_cases(256), with_unfold))
    suites.append((layers.vgg_small_cases(16)[:1 if quick else None],
                   False))
    suites.append((layers.resnet50_bottleneck_cases(16), False))
    for cases, unf in suites:
      layer_results += layers.run_suite(
          cases, repeats=reps, with_unfold=unf,
          unfold_repeats=1 if quick else 2)
    print()
    print(layers.report(layer_results, title='Layers'))
    print('## Layers: rates vs the machine floor\n')
    print(efficiency_table(layer_results, fl) + '\n', flush=True)

  model_results = []
  if not fv['skip-models'].value:
    print('# 3. Model level\n', flush=True)
    cases = models.default_cases(quick)
    model_results = models.run_suite(cases, repeats=3 if quick else 5)
    print()
    print('## Train step (forward + backward + SGD momentum, BN train '
          'mode)\n')
    print(models.report(model_results), flush=True)

  print('# 4. Targets\n')
  text, data = targets(layer_results, model_results)
  print(text)
  load_after = common.load_average()
  print(f'load average before {load_before[0]:.2f}, after '
        f'{load_after[0]:.2f}; total {time.perf_counter() - t_start:.0f} s')
  print(common.machine_line())

  if fv.json:
    out = {
        'machine': common.machine_info(),
        'floor': fl.rates,
        'layers': [{
            'net': r.case.net, 'layer': r.case.name,
            'shape': r.case.shape_str, 'terms': r.case.terms,
            **{f'{k}_ms': c.median_s * 1e3 for k, c in r.cands.items()},
            **{f'{k}_mb': c.peak_bytes / 2**20 for k, c in r.cands.items()},
        } for r in layer_results],
        'models': [{
            'case': r.case.label,
            **{f'{k}_ms': c.median_s * 1e3 for k, c in r.cands.items()},
            **{f'{k}_mb': c.peak_bytes / 2**20 for k, c in r.cands.items()},
            **{f'{k}_compile_s': c.compile_s for k, c in r.cands.items()},
        } for r in model_results],
        'targets': data,
    }
    with open(fv.json, 'w') as f:
      json.dump(out, f, indent=1, default=float)


if __name__ == '__main__':
  cli.run(main, define_flags)
