"""Drop-in equivalents of other libraries' pooling modules, built on globalpool's kinds.

Each module here matches one library's conventions (its constructor, its inputs and outputs, its
saved configuration) while every value comes from :func:`globalpool.pool`, so padding is handled
the same way everywhere: a padded position never reaches the output or the gradient, and a sample
with no real position pools to 0.
"""
