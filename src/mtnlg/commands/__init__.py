"""One thin module per CLI command: ``add_arguments(parser)`` and ``run(args) -> int``.

Each module only parses, builds a config and calls the library; the work lives in the library.
"""
