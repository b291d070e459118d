"""Reports of a run: the summary table, the JSON document, the timeline CSV, the plot, the HTML page.

Each is rendered from a :class:`~ksmlab.scenario.result.RunResult` and never
changes it:

* :mod:`ksmlab.report.headline`: the answer first (memory saved, time to
  merge, ksmd's cost), for the terminal, the JSON and the HTML;
* :mod:`ksmlab.report.counters`: what each counter really counts, for the
  help, the table, the plot's legend and the report;
* :mod:`ksmlab.report.table`: the summary table (rich);
* :mod:`ksmlab.report.document`: the JSON document (schema ``ksmlab.run/1``),
  which reads back into the same result, so ``ksmlab plot RESULT.json`` draws
  what the run saw;
* :mod:`ksmlab.report.timeline`: the timeline as CSV;
* :mod:`ksmlab.report.plot`: the picture, PNG, SVG or PDF (matplotlib,
  imported only when a picture is asked for);
* :mod:`ksmlab.report.html`: the self-contained HTML page;
* :mod:`ksmlab.report.stat`: ``ksmlab stat``, the machine's own KSM.
"""
