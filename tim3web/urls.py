from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from tim3web import views
from tim3web.api import api

urlpatterns = [
    path("", views.home, name="home"),
    # accounts
    path("signup", views.signup, name="signup"),
    path("login", views.LoginView.as_view(), name="login"),
    path("logout", auth_views.LogoutView.as_view(), name="logout"),
    # wallet
    path("wallet", views.wallet, name="wallet"),
    path("wallet/deposit", views.deposit, name="deposit"),
    path("wallet/redeem", views.redeem, name="redeem"),
    path("wallet/faucet", views.faucet, name="faucet"),
    # flows and the explorer
    path("flows/<str:flow_id>", views.flow_detail, name="flow"),
    path("explorer", views.explorer, name="explorer"),
    path("explorer/messages/<str:msg_id>", views.message_detail, name="explorer-message"),
    path("explorer/processes/<str:process_id>", views.process_detail, name="explorer-process"),
    path("explorer/addresses/<str:address>", views.address_detail, name="explorer-address"),
    # operations (staff)
    path("ops", views.ops, name="ops"),
    path("ops/pause", views.ops_pause, name="ops-pause"),
    path("ops/resume", views.ops_resume, name="ops-resume"),
    path("ops/limits", views.ops_limits, name="ops-limits"),
    path("ops/coordinators/<str:verb>", views.ops_coordinator, name="ops-coordinator"),
    path("ops/system-check", views.ops_system_check, name="ops-system-check"),
    path("admin/", admin.site.urls),
    path("api/", api.urls),
]
