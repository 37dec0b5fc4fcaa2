"""Creating Pulsar clients the way Tally wants them."""
import pulsar


def connect(service_url, log_level=pulsar.LoggerLevel.Warn, **options):
    """A client that logs warnings and errors only: the C++ client logs every
    producer and consumer open and close at INFO, which buries Tally's output."""
    return pulsar.Client(service_url, logger=pulsar.ConsoleLogger(log_level), **options)
