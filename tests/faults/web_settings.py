"""Settings for the Daphne process of the fault-injection tests: the app's own
settings, with a fast password hasher so that registering and logging in 20
wallets does not spend half a minute in PBKDF2 (Daphne serves sync views one
at a time). Nothing else differs."""

from tim3web.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
