"""``ksmlab tune``: sweep KSM's knobs over a workload on Dask, and recommend a configuration.

* :mod:`~ksmlab.tune.grid`: the ``--grid`` options, checked; the references;
* :mod:`~ksmlab.tune.work`: one configuration's run and its figures (a Dask task);
* :mod:`~ksmlab.tune.sweep`: the runs on Dask (or one by one on the real kernel);
* :mod:`~ksmlab.tune.pareto`: the Pareto front and the recommendation rule;
* :mod:`~ksmlab.tune.ksmtuned`: the model of ksmtuned, a controller of the runner;
* :mod:`~ksmlab.tune.result`, :mod:`~ksmlab.tune.report`: the result and its outputs.

The guide is docs/tune.md.
"""
