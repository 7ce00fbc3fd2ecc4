"""Accounts: a Django user plus the wallet address it acts through."""

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from processes.runtime.ids import new_id
from processes.runtime.models import Wallet
from tim3web.models import Account


class SignupError(ValueError):
    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def create_account(*, username: str, password: str) -> Account:
    """A new user with a fresh wallet address."""
    username = (username or "").strip()
    if not username or len(username) > 150 or not all(c.isalnum() or c in "@.+-_" for c in username):
        raise SignupError("Choose a username of up to 150 letters, digits or @.+-_ characters.", code="invalid_username")
    User = get_user_model()
    try:
        validate_password(password or "", user=User(username=username))
    except ValidationError as exc:
        raise SignupError(" ".join(exc.messages), code="weak_password") from exc
    try:
        with transaction.atomic():
            user = User.objects.create_user(username=username, password=password)
            address = new_id()
            Wallet.objects.create(address=address, label=f"user:{username}")
            return Account.objects.create(user=user, address=address)
    except IntegrityError as exc:
        raise SignupError("That username is taken.", code="username_taken") from exc


def wallet_of(user) -> str:
    """The user's wallet address, created on first use (e.g. for createsuperuser admins)."""
    account = Account.objects.filter(user=user).first()
    if account is None:
        with transaction.atomic():
            address = new_id()
            Wallet.objects.create(address=address, label=f"user:{user.get_username()}")
            account = Account.objects.create(user=user, address=address)
    return account.address
