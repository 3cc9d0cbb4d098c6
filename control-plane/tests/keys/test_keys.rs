// Test-only keys: generated for this repository, never used anywhere else.
pub const JWKS: &str = r#"{
  "keys": [
    {
      "kty": "RSA",
      "kid": "rsa-1",
      "use": "sig",
      "alg": "RS256",
      "n": "xS5S709OtmQu1OVoodo8HVsLF4R7C-EIPgXMSejNYMsPPK-CvjuW3gNPL0WI4RNRc-w6rTHDbkNVNCymnJCuSqEEVrx51z3KguJAZbqdqbx3ocPajA66ZBbsO3kurql8ZgnWcd735kgldvydVgUq_bi98SZMuGutg8RcoEgI8ugnF-EY45ga1HL5YSDwG-smElfA8iFIf2MOIImVgr-bAWltzJpsseI29IaAZCSaZff4IM9qcnr0wCnTgL0gmkK-Md52Lh1Ywdj55VaXufVgrHyYuUOpT_ipyZDdxTnbrMGsbij6_qA1baP7RWAIAIFv8G-NO42vkP8_Ho8EW0zkaQ",
      "e": "AQAB"
    },
    {
      "kty": "EC",
      "kid": "ec-1",
      "use": "sig",
      "alg": "ES256",
      "crv": "P-256",
      "x": "rebdQ88S1bwnOF5G-aJY7vmnTSZfLhbtsJd7GCgqxxc",
      "y": "CKARfkLimZdLLJkQhtpqXF-F72eWd03QmA6RUUUJQEw"
    }
  ]
}"#;
pub const RSA_PRIVATE_PEM: &str = r#"-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDFLlLvT062ZC7U
5Wih2jwdWwsXhHsL4Qg+BcxJ6M1gyw88r4K+O5beA08vRYjhE1Fz7DqtMcNuQ1U0
LKackK5KoQRWvHnXPcqC4kBlup2pvHehw9qMDrpkFuw7eS6uqXxmCdZx3vfmSCV2
/J1WBSr9uL3xJky4a62DxFygSAjy6CcX4RjjmBrUcvlhIPAb6yYSV8DyIUh/Yw4g
iZWCv5sBaW3Mmmyx4jb0hoBkJJpl9/ggz2pyevTAKdOAvSCaQr4x3nYuHVjB2Pnl
Vpe59WCsfJi5Q6lP+KnJkN3FOduswaxuKPr+oDVto/tFYAgAgW/wb407ja+Q/z8e
jwRbTORpAgMBAAECggEAKlRQf4lB94u4NgHtnVlRMGgcEHdjRuCPOWlbOr6cYFwX
MErpQVdfgtepBxfhU5gnE0CyM/4L2z7fKq0vM0sn72Nzn/8kFN3x/Hj/pBcUw5xu
/i4iW5DJ2LTHD9lq+RnvV6RjAd0A0NHKISoHyLChUwh21i8Hp0uOW0wrKklsimCF
ZbSqeUoZUBn1zPzg86Y6F5vmlU1ufeGmOKsDDfFFix+LyJBROdcU6KoO1z/DD1ul
whcEVx0jyT/4FktAtaxtNPhdjxTO3vrMpmYA+UtN7sZhkeWYDHR+E5ndTPKA3Tba
okObxC6arvktVPr0qqdDetJ0du3A01a3piGQhjvoFQKBgQDvCLcuvno4HOIlQ8Fe
R1mR6IcVroVh91URaaYwBKL0zOe8wf5oDZ6JD+M3yWgsZN3PreOfdUQtzNN3nuhe
1e9RZU1JsBAyIzW7zJi5miRUtqc+QJyv1m1Y4UqAsOEzYlTdGh9ZKvA+gExcJ8v8
trpvyThI4b+dPSqhQ+Q5SmcIkwKBgQDTLSGmfjGwrJ/81qIKdd+NsEQHQnG1KPD/
v1O1GeHZWNMC50VasBYQ/kt6grTRcYXJEfC3WmxrvrNe89bGzvx8jLTwBNKddjrz
G3DkROUhihIfM6ZgAi/DGpstViWQ/JsRJCQpUYGV1zyToYfb8wBxbAQq1T4ujD8e
RC6cj4QokwKBgQCVa2ZO0wTFZNC8qKEMlR9ZhPhERmbceWZ0zwzygUN4MUo/BSlJ
1BGg7gyEB+OVtKuvMazTNdObqaka4nuxJJxHzkJE6MkG/lmNfnSNuNwzFEZxNKR9
ilWqNJKE5YywuSwBVl34OE4bU8nn5XyvCW57iFYlwPAtk1m9mxnj8i17/wKBgFgg
DFvja68TyswDcam12O3S8gCpjLQR+shvOmpn+6Ts+VnL01huBTdgN3VPmE+S9Uac
cvzBAl/QPCBS130toZYETfmfuZi2XxFWkTzhN1FQwhE9R5/nKbFcqAc6XQDtOXTk
xSZs+gviv0fIb96swLGUZwTM6l8Ybbqer2jsRzV7AoGBAN8sXXe+mQ4mSU8SXLMH
ZHyQXGxXC9wm/D3r2VhZCcn4UvVzajjB4xOO3VoDqCBqa0fWNubdvUDey1ABNrqy
RZJHGqYA9wxPeSbEQFyv2Q1I2+ZDACyyr0lQ23oj4kFpugyx0ji6TLwDhM1EWGwN
ZbXd68DEVc3s8wOnRfbh9lPk
-----END PRIVATE KEY-----
"#;
pub const EC_PRIVATE_PEM: &str = r#"-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3CVCBOAdYhFnx4K3
yvfhjJRdP1+DmogjT4veFGZAGh2hRANCAASt5t1DzxLVvCc4Xkb5olju+adNJl8u
Fu2wl3sYKCrHFwigEX5C4pmXSyyZEIbaalxfhe9nlndN0JgOkVFFCUBM
-----END PRIVATE KEY-----
"#;
