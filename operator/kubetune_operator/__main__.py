from kubetune_operator.main import command

command()
