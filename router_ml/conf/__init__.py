"""Configs that ship inside the package: ``policy/<name>.yaml``, each routing policy's parameters.

They are the one copy: the proxy reads them (:data:`router_ml.paths.POLICY_CONFIG_DIR`), and the Hydra
experiments reach them as their ``policy`` group through ``hydra.searchpath: [pkg://router_ml.conf]``
(``conf/evaluate.yaml``). A package (this file) because Hydra's ``pkg://`` search path needs one.
"""
