"""The offline world, for tests and the demo without NSD or the Hub: NSD-format files with planted responses
(:mod:`~brainldm.offline.synthetic`), the world built end to end (:mod:`~brainldm.offline.world`), the models it
registers with the product (:mod:`~brainldm.offline.twins`), ``toy`` (the trained offline LDM: its parts, training and
card) and the meaning reader that scores it. It imports the product; the product never imports it (only the app's
:mod:`brainldm.demo`, to build the world) and knows its models only through the registry."""
