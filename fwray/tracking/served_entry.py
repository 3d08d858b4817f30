"""The file MLflow copies into each fwray MLflow model and runs to load it ("models from code", fwray.tracking.served): it names
the model's class, so no pickle is needed. Not imported by fwray itself."""
from mlflow.models import set_model

from fwray.tracking.served import Generator

set_model(Generator())
