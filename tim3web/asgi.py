import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tim3web.settings")
# Under ASGI every request runs its sync code in a thread of its own, so a persistent
# database connection (CONN_MAX_AGE > 0) is never reused: it stays open until garbage
# collection. Under load Daphne held ~90 idle connections and Postgres refused
# everyone else ("too many clients"), workers included. Django's advice: 0 under ASGI.
os.environ.setdefault("DB_CONN_MAX_AGE", "0")

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()

from tim3web.limits import LimitConcurrency  # noqa: E402
from tim3web.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter({
    "http": LimitConcurrency(django_asgi_app),  # at most TIM3_HTTP_CONCURRENCY requests (and DB connections) at once
    "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
})
