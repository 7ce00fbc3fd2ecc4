"""All models of the engine and the blueprints, collected for Django."""

from processes.blueprints.state import *  # noqa: F401,F403
from processes.flows import Flow  # noqa: F401,E402
from processes.runtime.models import Message, Process, Wallet  # noqa: F401
