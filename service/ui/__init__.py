"""``tally ui``: a read-only web UI over the registry, the online store and
the streaming service's metrics, for finding, checking and reviewing
features in a browser.

* ``server``   - :class:`UiServer`: the asyncio HTTP server (the lookup
  server's request parsing), its routes and its token;
* ``pages``    - one function per page, each returning HTML;
* ``html``     - escaping, links, tables and the page layout;
* ``svg``      - inline SVG: line charts, histograms, the lineage picture;
* ``lineage``  - the lineage graph (topic -> source -> view -> feature ->
  feature service) from the registry's lineage, and a node's neighbourhood;
* ``metrics``  - the service's ``/metrics`` (Prometheus text) sampled into an
  hour of history per view: event rate, freshness, lag;
* ``online``   - online values through the lookup path (``LookupService``),
  and entity samples for distributions;
* ``demo``     - the talk's model applied to a registry, with a store written
  through the store API: the tests' and the screenshots' fixture;
* ``screenshots`` - ``python -m tally.service.ui.screenshots`` refreshes
  ``docs/ui/*.png`` in headless Chromium.

Pages are server-rendered HTML with inline SVG and one stylesheet, and no
JavaScript: nothing is fetched from elsewhere at run time, and the Content
Security Policy says so.
"""
