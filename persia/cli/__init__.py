"""The ``persia`` command: one module per subcommand (``train``, ``validate``), dispatched by
:mod:`persia.cli.main`."""
