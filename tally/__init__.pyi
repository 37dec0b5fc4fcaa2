# Type stubs of Tally's public face (the names tally/__init__.py loads lazily).
from tally.core.definitions import Entity as Entity
from tally.core.definitions import Feature as Feature
from tally.core.definitions import FeatureService as FeatureService
from tally.core.definitions import FeatureView as FeatureView
from tally.core.definitions import Join as Join
from tally.core.definitions import Derived as Derived
from tally.core.definitions import RequestFunction as RequestFunction
from tally.core.definitions import Source as Source
from tally.core.definitions import Window as Window
from tally.core.errors import DefinitionError as DefinitionError
from tally.core.errors import TallyError as TallyError
from tally.core.errors import TrainingSetError as TrainingSetError
from tally.core.sql import load_sql as load_sql
from tally.core.sql import sql as sql
from tally.service.lookup.client import AsyncLookupClient as AsyncLookupClient
from tally.service.pulsar.cluster import Cluster as Cluster
from tally.service.lookup.client import LookupClient as LookupClient
from tally.service.lookup.client import LookupServerError as LookupServerError
from tally.service.registry import Registry as Registry
from tally.service.store import open_store as open_store
from tally.service.training import PulsarTopic as PulsarTopic
from tally.service.training import iter_training_batches as iter_training_batches
from tally.service.training import training_set as training_set

__version__: str
