"""Data sources: one module per source, each returning :class:`~oodlab.data.base.ImageSet` objects."""
