from iss.cli import app

app(prog_name="iss")
