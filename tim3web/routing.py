from django.urls import re_path

from tim3web.consumers import FlowConsumer, NoSuchStream

websocket_urlpatterns = [
    re_path(r"^ws/flows/$", FlowConsumer.as_asgi()),
    re_path(r"^ws/flows/(?P<flow_id>[A-Za-z0-9_-]{43})/$", FlowConsumer.as_asgi()),
    re_path(r"", NoSuchStream.as_asgi()),  # anything else: closed with 4404
]
