from django.shortcuts import render

from processes.runtime.models import Message, Process


def home(request):
    processes = Process.objects.order_by("created_at")
    recent = Message.objects.exclude(status=Message.PENDING).order_by("-seq")[:30]
    return render(request, "home.html", {"processes": processes, "recent": recent})
