"""The application on top of the library: the ``freetickets`` command and what its runs need.

``cli`` (``freetickets info|train|bench``), ``train_command`` and
``bench_command`` (its subcommands), ``bench/`` (the benchmark suites),
``training`` (``PlanRunner``: a dense / DST / EDST run with checkpoints and
resume), ``report`` (the table and result files of ``freetickets train``),
``data`` (the data sets it knows) and the run bookkeeping: ``checkpoint``,
``progress``, ``timing``, ``results``, ``machine``.

The dependency runs one way: this package imports the library core
(``layout``, ``ops``, ``backends``, ``nn``, ``dst``, ``flops``, ``ensemble``,
``models``, ``distributed``); the core never imports ``freetickets_kernels.app``
(tests/test_layers.py checks it).  Nothing is imported here, so importing one
module of the application does not import the others.
"""
