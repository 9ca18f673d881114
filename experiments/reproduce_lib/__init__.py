"""The MNIST reproduction of the AdderNet paper (``experiments.reproduce``).

Modules: :mod:`.plan` (epochs and configs), :mod:`.runs` (one training and
its read-back), :mod:`.lenetpp` (Figure 1's LeNet++-style net),
:mod:`.analysis` (distribution fits, adaptive scales), :mod:`.figures`
(PNGs), :mod:`.report` (``report.md``), :mod:`.pipeline` (everything in
order).
"""
