"""Stop requests: every process stops at one step, without a per-step sync."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest

from experiments import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Processes:
  """Stop requests of simulated processes sharing a fake allgather."""

  def __init__(self, n, sync_every, services=None):
    self.gathers = 0
    self.services = services
    self.stops = [preemption.StopRequest(
        sync_processes=True, sync_every=sync_every, allgather=self._gather,
        preemption_service=services[i] if services else False)
                  for i in range(n)]

  def _gather(self, x):
    del x
    self.gathers += 1
    return np.array([s.signum for s in self.stops], np.int32)

  def run(self, steps, signals):
    """Polls every process after every step; signals: {step: (process, sig)}.

    With a preemption service, SIGTERM goes to the service (JAX's notifier),
    not to the stop request.

    Returns:
      (stop step, signal number), the same for every process.
    """
    for step in range(1, steps + 1):
      for process, signum in signals.get(step, []):
        if self.services and signum == signal.SIGTERM:
          self.services[process].sigterm()
        else:
          self.stops[process].signum = self.stops[process].signum or signum
      answers = {s.poll(step) for s in self.stops}
      assert len(answers) == 1, (step, answers)
      if answers != {0}:
        return step, answers.pop()
    return None, 0


@pytest.mark.parametrize('signals,expected', [
    ({13: [(0, signal.SIGINT)]}, (20, signal.SIGINT)),
    ({37: [(1, signal.SIGTERM)]}, (40, signal.SIGTERM)),
    # Different signals at different steps on the two processes: the larger.
    ({11: [(1, signal.SIGINT)], 19: [(0, signal.SIGTERM)]},
     (20, signal.SIGTERM)),
    ({20: [(1, signal.SIGINT)]}, (20, signal.SIGINT)),  # at a multiple
    ({}, (None, 0)),
])
def test_processes_agree_every_n_steps(signals, expected):
  processes = _Processes(2, sync_every=10)
  assert processes.run(1000, signals) == expected
  stop_step = expected[0] or 1000
  # One allgather per process every sync_every steps, none in between.
  assert processes.gathers == 2 * (stop_step // 10)


class _FakeService:
  """JAX's preemption sync protocol, in one process: agreed step = max + 1."""

  def __init__(self, n):
    self.last = [0] * n
    self.sync_step = None
    self.notices = 0

  def process(self, i):
    service = self

    class _View:

      def sigterm(self):
        """What JAX's SIGTERM notifier does: posts a notice."""
        service.notices += 1
        if service.sync_step is None:
          service.sync_step = max(service.last) + 1

      def reached(self, step):
        service.last[i] = step
        return step == service.sync_step

    return _View()


def test_sigterm_stops_at_the_preemption_sync_step(caplog):
  service = _FakeService(2)
  processes = _Processes(2, sync_every=10,
                         services=[service.process(i) for i in range(2)])
  # JAX's notifier of process 1 posts the notice after its step 23.
  with caplog.at_level('WARNING'):
    assert processes.run(1000, {24: [(1, signal.SIGTERM)]}) == (
        24, signal.SIGTERM)
  assert service.notices == 1
  assert processes.gathers == 2 * 2  # steps 10 and 20 only
  assert caplog.text.count(
      "SIGTERM (via JAX's preemption service): saving at step 24") == 2


def test_sigint_is_not_left_to_the_preemption_service():
  service = _FakeService(2)
  processes = _Processes(2, sync_every=10,
                         services=[service.process(i) for i in range(2)])
  assert processes.run(1000, {24: [(1, signal.SIGINT)]}) == (
      30, signal.SIGINT)
  assert service.notices == 0


def test_sigterm_is_left_to_the_preemption_service():
  """JAX's SIGTERM handler stays; SIGINT is still caught (and restored)."""
  marker = lambda signum, frame: None  # stands for JAX's handler
  previous = signal.signal(signal.SIGTERM, marker)
  before_int = signal.getsignal(signal.SIGINT)
  try:
    with preemption.StopRequest(sync_processes=True,
                                preemption_service=_FakeService(1).process(0)
                               ) as stop:
      assert signal.getsignal(signal.SIGTERM) is marker
      assert signal.getsignal(signal.SIGINT) == stop._handler
    assert signal.getsignal(signal.SIGINT) is before_int
    # Without a service, SIGTERM is caught (and restored) again.
    with preemption.StopRequest(sync_processes=True,
                                preemption_service=False) as stop:
      assert signal.getsignal(signal.SIGTERM) == stop._handler
    assert signal.getsignal(signal.SIGTERM) is marker
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_jax_service_is_used_only_where_it_has_a_sync_manager(monkeypatch):
  """One call of reached_preemption_sync_point(start_step) tells."""
  calls = []

  def reached(step):
    calls.append(step)
    if manager:
      return False
    raise RuntimeError('Preemption sync manager has not been initialized.')

  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point',
                      reached)
  manager = False
  assert preemption.JaxPreemptionService.create(7) is None
  manager = True
  service = preemption.JaxPreemptionService.create(7)
  assert service is not None and calls == [7, 7]
  assert not service.reached(8) and calls == [7, 7, 8]
  with preemption.StopRequest(start_step=5) as stop:  # the service
    assert calls[-1] == 5
    assert signal.SIGTERM not in stop._previous
  with preemption.StopRequest(sync_processes=False) as stop:  # none
    assert calls[-1] == 5
    assert signal.SIGTERM in stop._previous
  monkeypatch.setattr(jax, 'process_count', lambda: 1)
  assert preemption.JaxPreemptionService.create() is None
  assert calls == [7, 7, 8, 5]


def test_bad_sync_every_is_named():
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match='sync_every'):
      preemption.StopRequest(sync_every=bad)
  for bad in (-1, 2.0, True):
    with pytest.raises(ValueError, match='start_step'):
      preemption.StopRequest(start_step=bad)


def test_one_process_answers_at_once_without_gathering():
  def gather(x):
    raise AssertionError('no allgather with one process')

  stop = preemption.StopRequest(sync_processes=False, sync_every=1,
                                allgather=gather)
  with stop:
    assert stop.poll(1) == 0
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.poll(2) == signal.SIGTERM
    assert stop.poll() == signal.SIGTERM


def test_second_signal_stops_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from experiments import preemption
      with preemption.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.poll(1) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
      print('not stopped')
  """)
  p = subprocess.run([sys.executable, '-c', code], cwd=REPO, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'),
                     capture_output=True, timeout=120)
  assert p.returncode == -signal.SIGTERM, p.stderr[-2000:]
  assert 'not stopped' not in p.stdout


# Two real processes (jax.distributed on localhost, gloo): process 1 sends
# itself a signal after step SIGNAL_STEP; both print the step they stop at
# and how many allgathers they ran. Process 0 runs its steps faster.
_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import jax
    from jax.experimental import multihost_utils
    from experiments import preemption
    port, pid, signum, every = map(int, sys.argv[1:])
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', 2, pid)
    gathers = []
    def gather(x):
      gathers.append(int(x))
      return multihost_utils.process_allgather(x)
    result = None
    with preemption.StopRequest(sync_every=every, allgather=gather) as stop:
      for step in range(1, 1201):
        time.sleep(0.005 if pid == 0 else 0.02)
        if pid == 1 and step == 30:
          os.kill(os.getpid(), signum)
        got = stop.poll(step)
        if got:
          result = (step, got)
          break
    print('RESULT', result, len(gathers), flush=True)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(signum, every, **env):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env)
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(
      [sys.executable, '-c', _WORKER, str(port), str(i), str(int(signum)),
       str(every)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-4000:]
      results.append(out.strip().splitlines()[-1])
  finally:
    for p in procs:
      p.kill()
  return results


def test_two_processes_stop_at_the_preemption_sync_step():
  """SIGTERM goes through JAX's preemption service: no allgather at all."""
  results = _two_processes(signal.SIGTERM, every=1000)
  assert results[0] == results[1], results
  step = int(results[0].split('(')[1].split(',')[0])
  assert 30 < step < 1200, results
  assert results[0].endswith(f'({step}, {int(signal.SIGTERM)}) 0'), results


@pytest.mark.slow
@pytest.mark.parametrize('signum,env', [
    (signal.SIGINT, {}),
    # The preemption service off: SIGTERM is agreed every N steps too.
    (signal.SIGTERM, {'JAX_ENABLE_PREEMPTION_SERVICE': 'false'}),
])
def test_two_processes_agree_every_n_steps(signum, env):
  results = _two_processes(signum, every=25, **env)
  assert results == [f'RESULT (50, {int(signum)}) 2'] * 2, results


def test_a_resumed_run_reports_its_start_step_to_the_service():
  """A notice during a resumed run's start-up is agreed past its first step
  (JAX's manager would otherwise agree on step 1, which it never reaches)."""
  service = _FakeService(1)
  view = service.process(0)
  stop = preemption.StopRequest(sync_processes=True, sync_every=1000,
                                preemption_service=view,
                                allgather=lambda x: np.asarray([x]))
  stop.begin(5000)
  assert service.last[0] == 5000
  view.sigterm()  # start-up: before the first poll
  assert [stop.poll(s) for s in (5001, 5002)] == [signal.SIGTERM, 0]
  with pytest.raises(ValueError, match='start_step=-1'):
    stop.begin(-1)
