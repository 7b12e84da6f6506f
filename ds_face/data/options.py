"""What the run YAML's ``data`` section may name, defined beside the code that implements it: the config
checks (``ds_face.config``) import these; imports nothing (the config is read before torch or numpy)."""

# synthetic: class-dependent generated images (ds_face.data.synthetic);
# arrow: a directory of shards written by data_prep (ds_face.data.arrow)
DATA_SOURCES = ("synthetic", "arrow")

ON_CORRUPT = ("skip", "fail")  # data.on_corrupt: what an undecodable image does (ds_face.data.arrow)
