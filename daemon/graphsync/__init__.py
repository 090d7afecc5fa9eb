"""graphsync: export Microsoft Graph collections on a schedule, sharing one MSAL token cache across replicas."""

__version__ = "0.1.0"
