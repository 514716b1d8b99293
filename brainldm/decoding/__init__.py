"""From brain to features: the ridge solvers and :class:`~brainldm.decoding.maps.SubjectMaps` (the fitted linear
maps, on the Hub as safetensors), apart from the job that fits them (:mod:`brainldm.decoding.fit`). Imports the
ground floor and ``data``; never ``ldm``."""
