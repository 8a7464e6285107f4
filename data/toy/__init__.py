"""The toy worlds, whose every image's factors are known: the renderer of toy faces
(``faces``), the toy DDPM's recipe (``recipe``), toy-sd's recipe and captions (``sd``,
``captions``), their training (``train``, ``train_sd``; Prefect runs them from
flows/train_toy.py) and toy-sd's quality study (``sd_quality``). The trained weights ship
beside this package, in data/toy_model/, data/toy_sd_model/ and data/oracle/."""
