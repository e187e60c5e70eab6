"""The research lab: the ``globalpool`` command line and what it runs, beside the library.

``compare`` (which head wins: :mod:`globalpool.lab.experiments`, on the data of
:mod:`globalpool.lab.data` and the backbones of :mod:`globalpool.lab.models`), ``bench`` and
``bench-memory`` (:mod:`globalpool.lab.bench`), ``cam`` and the localisation study
(:mod:`globalpool.lab.cam`) and ``warmup``. The lab needs the ``lab`` extra
(``pip install "globalpool[lab]"``: typer, rich, matplotlib, mnist1d, scikit-learn, pillow) and
uses the library only through its public names (``import globalpool as gp``,
:mod:`globalpool.reference`); ``import globalpool`` never imports the lab.
"""
