"""Settings: flag > environment variable > tally.toml > built-in default, the
project file found walking up, refused keys, ``tally init``, and the one
``Cluster`` every connection is made from."""
import os
import subprocess
import sys

import pytest

from tally.service import config
from tally.service.cli import build_parser
from tally.service.pulsar.cluster import Cluster, ClusterConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with a tally.toml, the working directory a level
    below it, no TALLY_* variables and no --config."""
    for name in list(os.environ):
        if name.startswith("TALLY_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "_chosen_file", None)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    return tmp_path


def write(path, text):
    path.write_text(text)
    return path


def test_precedence_is_flag_then_environment_then_file_then_default(project, monkeypatch):
    assert config.default("pulsar") == "pulsar://127.0.0.1:6650"       # no file yet
    assert config.default("store") == os.path.join(".tally", "store")
    write(project / "tally.toml", 'pulsar = "pulsar+ssl://file:6651"\n')
    assert config.default("pulsar") == "pulsar+ssl://file:6651"
    # with a project file, the built-in paths are the project's
    assert config.default("store") == str(project / ".tally" / "store")
    monkeypatch.setenv("TALLY_PULSAR", "pulsar://env:6650")
    assert config.default("pulsar") == "pulsar://env:6650"
    args = build_parser().parse_args(["serve", "x.py"])
    assert args.pulsar == "pulsar://env:6650"
    args = build_parser().parse_args(["serve", "x.py", "--pulsar", "pulsar://flag:1"])
    assert args.pulsar == "pulsar://flag:1"


def test_relative_paths_in_the_file_are_relative_to_it(project):
    write(project / "tally.toml", 'store = "data/store"\nregistry = "/abs/registry.db"\n'
          'checkpoints = "~/ckpt"\n[tls]\nca_file = "certs/ca.pem"\n'
          '[auth]\ntoken_file = "token"\n')
    assert config.default("store") == str(project / "data" / "store")
    assert config.default("registry") == "/abs/registry.db"
    assert config.default("checkpoints") == os.path.expanduser("~/ckpt")
    cluster = config.cluster()
    assert cluster.tls_ca_file == str(project / "certs" / "ca.pem")
    assert cluster.token_file == str(project / "token")
    write(project / "tally.toml", 'store = "aerospike://h:3000/ns"\n')
    assert config.default("store") == "aerospike://h:3000/ns"


def test_unknown_keys_and_wrong_types_are_refused_naming_key_and_file(project):
    path = write(project / "tally.toml", '[tls]\nca = "ca.pem"\n')
    with pytest.raises(config.ConfigError, match=rf"{path}: unknown setting 'tls.ca'"):
        config.default("pulsar")
    write(path, "[tls]\nallow_insecure = \"yes\"\n")
    with pytest.raises(config.ConfigError, match="tls.allow_insecure must be a bool"):
        config.default("tls.allow_insecure")
    write(path, "pulsar = \n")
    with pytest.raises(config.ConfigError, match=str(path)):
        config.default("pulsar")
    # the command line says so in one line, exit status 2
    result = subprocess.run([sys.executable, "-m", "tally", "--config", str(path), "list"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"tally: {path}: ")


def test_config_option_and_variable_choose_the_file(project, monkeypatch, tmp_path_factory):
    other = write(tmp_path_factory.mktemp("elsewhere") / "prod.toml",
                  'admin = "https://prod:8443"\n')
    write(project / "tally.toml", 'admin = "http://found:8080"\n')
    assert config.default("admin") == "http://found:8080"
    monkeypatch.setenv("TALLY_CONFIG", str(other))
    assert config.default("admin") == "https://prod:8443"
    monkeypatch.delenv("TALLY_CONFIG")
    config.use_file(str(other))
    assert build_parser().parse_args(["create-topic", "t"]).admin == "https://prod:8443"
    config.use_file(str(project / "missing.toml"))
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.default("admin")


def test_booleans_from_the_environment(project, monkeypatch):
    monkeypatch.setenv("TALLY_TLS_VALIDATE_HOSTNAME", "false")
    assert config.cluster().tls_validate_hostname is False
    monkeypatch.setenv("TALLY_TLS_VALIDATE_HOSTNAME", "maybe")
    with pytest.raises(config.ConfigError, match="TALLY_TLS_VALIDATE_HOSTNAME"):
        config.cluster()


def test_init_scaffolds_a_project_and_never_overwrites(project):
    target = project / "new"
    result = subprocess.run([sys.executable, "-m", "tally", "init", str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")
                  if p.is_file()) == ["README.md", "definitions/reading.py", "tally.toml"]
    # every setting is in the file, commented out; uncommented it is accepted
    # and gives the built-in defaults
    text = (target / "tally.toml").read_text()
    assert config.load(str(target / "tally.toml")) == {}
    uncommented = write(project / "all.toml", "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line
        for line in text.splitlines()))
    values = config.load(str(uncommented))
    assert set(values) == set(config.SETTINGS)
    assert values["pulsar"] == config.SETTINGS["pulsar"].default
    assert values["tls.validate_hostname"] is True
    # the example loads as definitions
    from tally.service.registry import load_file
    assert load_file(str(target / "definitions" / "reading.py"))
    (target / "README.md").write_text("mine")
    again = subprocess.run([sys.executable, "-m", "tally", "init", str(target)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    assert (target / "README.md").read_text() == "mine"


def test_cluster_maps_each_auth_method_to_the_client_and_rest():
    import pulsar
    token = Cluster("pulsar+ssl://b:6651", "https://b:8443", token="abc",
                    tls_ca_file="/ca.pem", tls_cert_file="/c.pem", tls_key_file="/c.key")
    options = token.client_options()
    assert isinstance(options["authentication"], pulsar.AuthenticationToken)
    assert options["tls_trust_certs_file_path"] == "/ca.pem"
    # alongside a token, the certificate is presented at the TLS layer (mTLS)
    assert options["tls_certificate_file_path"] == "/c.pem"
    assert token.http_headers() == {"Authorization": "Bearer abc",
                                    "X-Pulsar-Auth-Method-Name": "token"}
    certificate = token.replace(token=None)
    assert certificate.auth_method == "tls"
    assert isinstance(certificate.client_options()["authentication"],
                      pulsar.AuthenticationTLS)
    assert "tls_certificate_file_path" not in certificate.client_options()
    assert certificate.http_headers() == {}
    assert Cluster("pulsar://b:6650").client_options().get("authentication") is None
    assert "abc" not in repr(token)                        # secrets stay out of logs


def test_cluster_refuses_settings_that_cannot_work_together():
    with pytest.raises(ClusterConfigError, match="one authentication method"):
        Cluster(token="a", token_file="/t")
    with pytest.raises(ClusterConfigError, match="issuer URL and a credentials file"):
        Cluster(oauth2_issuer_url="https://issuer")
    with pytest.raises(ClusterConfigError, match="cert and key"):
        Cluster(tls_cert_file="/c.pem")
