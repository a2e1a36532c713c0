"""What a run gives back: the result types (``results``: :class:`~lrsearch.output.results.SearchResult`,
:class:`~lrsearch.output.results.BestConfig`), the terminal report (``report``) and the export
formats a training script uses (``formats``)."""
