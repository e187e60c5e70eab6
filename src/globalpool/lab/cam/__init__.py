"""``globalpool cam`` and the localisation study: class activation maps of the models
``compare`` kept, drawn (:mod:`~globalpool.lab.cam.render`) and scored
(:mod:`~globalpool.lab.cam.localization`). The maps themselves come from the library's
:func:`globalpool.class_activation_maps`.
"""
