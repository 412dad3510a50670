"""The payload of vtprune's ``lmms_eval.models`` entry point: ``--model vtprune``.

lmms-eval loads every entry point of the group inside one try/except on each import of its models
package, so this module imports nothing heavy and names the class by its dotted path.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="vtprune", simple_class_path="vtprune.evaluation.lmms_model.VtpruneLMM")
