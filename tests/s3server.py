"""An S3-compatible store on 127.0.0.1 for the tests: moto's standalone server in its own process, with IAM
authentication on once it is set up (moto's INITIAL_NO_AUTH_ACTION_COUNT: the first N requests go unchecked, every
later one needs an access key moto issued). Setup makes a bucket, a user allowed everything on S3 and a user allowed
nothing, so "no permission" and "credentials refused" are the store's own answers, not a stand-in.
"""
import json
import os
import socket
import subprocess
import sys
import time

BUCKET = "fwray-test"
REGION = "us-east-1"
START_S = 30
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
SETUP_REQUESTS = 6  # exactly the requests `_set_up` makes, unauthenticated; IAM applies from the next one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, log_path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.users: dict[str, dict[str, str]] = {}
        self.log = open(log_path, "w")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.1)
        self._set_up()

    def _set_up(self) -> None:
        import boto3

        setup = dict(endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **setup)
        for name, policy in (("allowed", ALLOW_S3), ("denied", None)):
            iam.create_user(UserName=name)
            if policy:
                iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            self.users[name] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def env(self, user: str | None = "allowed") -> dict[str, str]:
        """The environment a client of this store needs: where it is, and `user`'s keys (None: no credentials at
        all, and no profile file or instance metadata to find any in)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                **(self.users[user] if user else {})}

    def filesystem(self):
        """The allowed user's view of the store, for a test to look inside."""
        import pyarrow.fs as pafs

        keys = self.users["allowed"]
        return pafs.S3FileSystem(access_key=keys["AWS_ACCESS_KEY_ID"], secret_key=keys["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_override=self.endpoint, region=REGION)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
