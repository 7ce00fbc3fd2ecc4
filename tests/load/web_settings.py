"""Settings for the load test's Daphne: the app's own settings with a fast
password hasher, so that registering 200 wallets through the API does not
spend minutes in PBKDF2 (Daphne runs sync views one at a time). Nothing else
differs."""

from tim3web.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
