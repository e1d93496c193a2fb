"""What every role uses: starting and stopping processes, their watchdog, loading kits.

Role-neutral: ``fedvault.server`` and ``fedvault.client`` both import it and never each other.
"""
